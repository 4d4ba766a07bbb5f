from cafs.cli import main

main()
