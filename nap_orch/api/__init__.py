"""The HTTP API (aiohttp): authenticates, validates, records the job, enqueues it, answers 202.

``app.py`` (the application and its resources), ``routes.py`` (routes and handlers), ``sse.py``
(event streams), ``auth.py`` (users and their tokens), ``context.py`` (what the application holds, and the caller).
"""
