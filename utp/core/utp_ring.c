/*
 * utp_ring.c -- a ring of pointers indexed by 16-bit sequence number.
 *
 * Both the retransmission buffer and the reorder buffer hold a window of
 * consecutive sequence numbers.  The ring starts small and doubles on demand
 * up to a limit, so ten thousand idle connections cost little memory while a
 * busy one can keep a full window in flight.
 */
#include "utp_internal.h"

/* Makes room for sequence numbers base .. base + span - 1.  Live entries must
 * lie in base .. base + capacity - 1 before the call.  0 or UTP_ERR_NOMEM
 * (also when span exceeds limit). */
int utp_ring_reserve(utp_ring *r, uint16 base, uint32 span, uint32 limit)
{
	uint32 oldcap = r->slots ? r->mask + 1 : 0, cap, i;
	void **slots;
	if (span <= oldcap)
		return 0;
	if (span > limit)
		return UTP_ERR_NOMEM;
	cap = oldcap ? oldcap : 16;
	while (cap < span)
		cap *= 2;
	slots = calloc(cap, sizeof *slots);
	if (slots == NULL)
		return UTP_ERR_NOMEM;
	for (i = 0; i < oldcap; i++) {
		uint16 seq = (uint16)(base + i);
		slots[seq & (cap - 1)] = r->slots[seq & r->mask];
	}
	free(r->slots);
	r->slots = slots;
	r->mask = cap - 1;
	return 0;
}

void utp_ring_free(utp_ring *r)
{
	free(r->slots);
	r->slots = NULL;
	r->mask = 0;
}
