from hnmix.cli import main

if __name__ == "__main__":  # `python -m hnmix ...` and `torchrun -m hnmix ...`
    main()
