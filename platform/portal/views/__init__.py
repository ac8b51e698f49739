"""The customer portal's pages (docs/architecture.md, "Portal"), by concern: `nodes` (the node
list, deploying, a node's page, bringing your own machine) and `account` (signing up, password
reset, members, alert channels, API tokens, billing, docs). Each view reads through the apps'
selectors and acts through their services, as the API does; the account is the signed-in user's,
and anything of another account is 404."""
