"""The `lathe` client commands: files, jobs, workers and usage over the HTTP API.

A client like any other: it speaks HTTP only (httpx) and never imports torch, transformers
or the server's modules.
"""
