"""The client side: run a session across hops, the local engine, the public client."""
