"""ggserve engine: everything between "token ids in" and "token ids out".

The server layer imports only the names re-exported here.
"""
