"""
sw_example's program: print the sum of some numbers, as a float.

``python /add.py 4 5`` prints ``9.0``. With no arguments the numbers are read from standard input
(any whitespace between them), so ``python /add.py < stdin.txt`` with ``30 40`` prints ``70.0``.
A value that is not a number ends the program with an error on standard error and exit status 1.
"""

from __future__ import annotations

import sys


def parse_numbers(words: list[str]) -> list[float]:
    """Return the words as floats, or exit with status 1 naming the first one that is not a number."""
    numbers = []
    for word in words:
        try:
            numbers.append(float(word))
        except ValueError:
            sys.stderr.write(f"add.py: error: {word!r} is not a number\n")
            sys.exit(1)
    return numbers


def main(argv: list[str]) -> None:
    """Print the sum of the numbers given as arguments, or else read from standard input."""
    words = argv if argv else sys.stdin.read().split()
    print(sum(parse_numbers(words), 0.0))


if __name__ == "__main__":
    main(sys.argv[1:])
