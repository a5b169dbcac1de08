"""Stand-ins for the WebUI hosts, used by the tests only (never shipped as host code)."""
