"""The vTPU Cloud control plane's project package: settings, URLs, WSGI."""
