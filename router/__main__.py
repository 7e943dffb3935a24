from router.admin.cli import main

main()
