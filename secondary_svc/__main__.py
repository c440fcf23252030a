from secondary_svc.server import main

main()
