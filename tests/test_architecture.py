"""docs/architecture.md holds the import graph that docs/import_graph.py reads from the source today."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _generator():
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "docs" / "import_graph.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_architecture_doc_matches_the_code():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    block = doc.split("<!-- generated -->\n", 1)[1].split("<!-- /generated -->", 1)[0]
    assert block == _generator().render(), "docs/architecture.md is stale: run python docs/import_graph.py"


def test_every_module_has_a_layer():
    generator = _generator()
    for name in generator.modules():
        generator.component(name)   # KeyError for a module outside every layer


def test_spec_is_a_leaf():
    edges = _generator().graph()
    assert not edges["spec"]["top"] and not edges["spec"]["function"]
