"""`python -m delving.data fetch [--install-debian]`: make Fashion-MNIST available, or say how."""

import argparse
import sys

from delving.data.fashion_mnist import DatasetError, fetch

parser = argparse.ArgumentParser(prog="python -m delving.data", description=__doc__)
parser.add_argument("command", choices=["fetch"])
parser.add_argument("--install-debian", action="store_true",
                    help="when running as root on Debian/Ubuntu, apt-get install dataset-fashion-mnist")
args = parser.parse_args()
try:
    print(f"Fashion-MNIST: verified in {fetch(install_debian=args.install_debian)}")
except DatasetError as e:
    sys.exit(f"error: {e}")
