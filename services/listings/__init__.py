"""Listings: information that finds people — vacant houses (空き家) and trial stays, jobs and side jobs
(なりわい), events and community activities (コミュニティ), coworking places and childcare programmes
(保育園留学) that municipalities and their support corporations publish for dual residents.

Owns: listings with the owner's consent to publish (vacant houses and trial stays: no consent, no
listing), residents' interests and their consent to receive matching listings, the matches waiting
for a digest, "interested" with a per-listing consent to give the owner one's contact, and the record
of each contact given. Events: ``listings.listings.v1`` (public content), ``listings.digests.v1``
(a digest per resident, which notification turns into a message and an e-mail).
"""
