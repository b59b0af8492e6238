"""The quick start: store a value in a named dict and read it back.

The first call starts a daemon in the background if none is running. Run the script
twice: the second run finds the dict, and the value, that the first run stored.
"""

from sharedict import Dict

kv = Dict.from_name("kv", create_if_missing=True)
kv["cloud"] = "dictionary"
print(kv["cloud"])
