"""Authentication, authorisation and the network policy for every call (hook plugin
``security``)."""
