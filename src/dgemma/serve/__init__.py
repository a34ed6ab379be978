"""`dgemma serve`: an OpenAI-compatible HTTP server on the Engine (optional extra: pip install 'dgemma[serve]').

worker.py  one thread owns the Engine; handlers submit / cancel / warm through it
protocol.py  OpenAI request/response shapes (the OpenAPI schema) and the error body
text.py    committed ids -> text deltas (incremental detokenizing, stop strings)
app.py     FastAPI routes, metrics, auth
cli.py     the command line and a uvicorn server that stops gracefully
"""
