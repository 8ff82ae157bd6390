"""The tests' fixtures (tests/fixtures.py), for test_chat.py here and for every file in tests/."""

pytest_plugins = ["tests.fixtures"]
