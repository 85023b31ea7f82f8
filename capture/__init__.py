"""The ground floor: the Bitcoin P2P protocol and Bitcoin Core's capture format, with no
I/O framework and nothing of msgcap's other packages.

v1 framing and the protocol constants (framing), BIP324 (bip324 and its events, cipher
and native pipe), Core's record format and the one capture reader (records,
conversation), the path layout (layout), the one write path (writer, batch), comparing
and exporting captures (compare, export), the error hierarchy every layer shares
(errors), command warnings (report) and the loader of the native parts (native).
"""
