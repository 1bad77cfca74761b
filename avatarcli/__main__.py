from avatarcli.cli.app import main

main()
