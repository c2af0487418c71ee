"""The engineering tests (the equations' own are test_equations.py, at the top). A package, so that a test borrows
functions of another as `from tests.test_data import ...`, and pytest puts the repository on the path."""
