"""The BookStore sample: the ABP guide's microservices, talking through eventrelay."""
