"""Every public name of nanoopt.quant resolves (the lazy ones included), and the spec imports alone."""

import subprocess
import sys

from nanoopt import quant


def test_every_public_name_resolves():
    for name in quant.__all__:
        assert getattr(quant, name) is not None, name
    assert set(quant.__all__) <= set(dir(quant))


def test_spec_imports_without_the_layers():
    code = "import nanoopt.spec, sys; assert 'nanoopt.quant.ptq' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
