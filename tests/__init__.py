"""The chat's tests by behaviour; test_chat.py, at the root, is the contract a learner reads first.

helpers.py holds what the tests call (requests, websocket clients, the chat as a process,
redis-server, nginx); fixtures.py the fixtures, for these files and test_chat.py alike.
"""
