"""Drop-in integrations of fastpo's ops into existing trainers."""
