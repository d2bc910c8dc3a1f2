"""ucat: netcat over uTP, across NATs.  Not written yet: this package is a placeholder.

It will be a command-line tool that pipes stdin/stdout over a uTP stream,
connecting directly or by hole punching, as a thin layer over the public
``utp`` API.  It has no entry point yet.
"""
