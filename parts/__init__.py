"""The armour of chat.py: each module does one job behind a small API, and none imports chat."""
