from zipmoe.cli import main

main()
