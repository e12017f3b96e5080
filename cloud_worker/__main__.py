import sys

from edgecascade.cli import main

sys.exit(main(["cloud", *sys.argv[1:]]))
