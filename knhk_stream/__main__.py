from knhk_stream.cli.main import main

main()
