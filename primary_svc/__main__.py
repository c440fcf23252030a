from primary_svc.server import main

main()
