"""The HTML console: sign-in, the customer's and the operator's pages, the public marketplace
pages. Server-rendered, no JavaScript required."""
