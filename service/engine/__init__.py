"""The engine process: the model, the beam-search row set and the step loop, apart from the front ends.

What lives here (DESIGN.md sections 3 and 5):

* ``messages``  the typed messages that cross the process boundary (msgspec structs, msgpack on the wire);
* ``core``      the engine process itself: a busy loop that admits requests between decode steps, runs one
                step for every live (request, beam) row and answers finished requests at once;
* ``cost``      what a request costs the engine (rows x steps) and the fitted seconds per step, used by
                admission in the front end to shed with 429 before a request can only end in 504;
* ``client``    the front end's side: spawns and supervises the engine processes, routes each request to
                the least-loaded one, and turns engine replies and engine deaths into answers.

The front-end process imports ``client``, ``cost`` and ``messages``; only the engine process imports
the model (``onerec``'s torch code runs there). Nothing here imports the HTTP or gRPC front ends.
"""
