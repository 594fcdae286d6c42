"""The proxy exchange: one client request carried to an upstream and back."""
