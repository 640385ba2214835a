#!/bin/sh
# Example F: a script that calls the software. Sent as a file with cmd=usrcmd.sh; the numbers come
# from the uploaded stdin.txt, which the run gets as its standard input.
python /add.py
