"""The test suite, one package: tests/<stage>/ mirrors src/lorascope/<stage>/, tests/test_<module>.py a
top-level module, tests/e2e/ the runs across stages. Packages (an ``__init__.py`` in every folder), so that
equal basenames in different folders import as different modules (``tests.seeds.test_seeds``,
``tests.e2e.test_seeds``) and helpers import by their full name (``from tests.conftest import REPO``)."""
