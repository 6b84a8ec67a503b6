from iqmaild.cli import main

main()
