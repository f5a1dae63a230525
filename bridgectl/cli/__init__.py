"""The command line: parse, check, call one package, print (bridgectl/cli/app.py holds every command)."""
