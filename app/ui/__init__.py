"""The web page at /ui: a job list and a job page for people (a security reviewer, say).

Pages are rendered on the server. A page holds no job data itself: its script fetches server-
rendered fragments with the API key it keeps in the browser's session storage, sent as the same
`Authorization: Bearer` header the JSON API takes, so a key never appears in a URL.
"""
