"""The browser page and the JavaScript step loop (web/), installed as package data for `dgport web`."""
