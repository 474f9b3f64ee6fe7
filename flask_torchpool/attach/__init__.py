"""One pool per host: the pool server and the web processes that attach to it.

::

    rendezvous.py   where the socket is, its private directory and lock, starting a server process,
                    checking a peer's user (shared by the client, the server and the gunicorn hook)
    server.py       the pool server: serves its models to attached web processes
    client.py       what an attached web process runs: its one connection to the server
    remote.py       RemotePool: one model of the server, the attached Backend

Importing this package (and :mod:`.rendezvous`) imports neither torch nor Flask: the gunicorn master,
which starts the server, stays light.
"""
