import sys

from edgecascade.cli import main

sys.exit(main(["broker", *sys.argv[1:]]))
