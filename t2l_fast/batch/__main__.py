"""``python -m t2l_fast.batch`` (and ``torchrun ... -m t2l_fast.batch``): the batch command alone."""

from t2l_fast.cli.batch import main

if __name__ == "__main__":
    main()
