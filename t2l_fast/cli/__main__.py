"""``python -m t2l_fast.cli``: the ``t2l-fast`` command."""

from t2l_fast.cli import app

if __name__ == "__main__":
    app()
