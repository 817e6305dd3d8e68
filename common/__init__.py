"""What every package shares and nothing in the project lies below: weight files, typed configs,
command-line basics. It imports no other package of this project."""
