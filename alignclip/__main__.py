from alignclip.cli import main

main()
