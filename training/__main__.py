import sys

from edgecascade.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
