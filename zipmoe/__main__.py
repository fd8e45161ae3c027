"""`python -m zipmoe ...`: the same as the `zipmoe` command."""
from zipmoe.cli import main

if __name__ == "__main__":
    main()
