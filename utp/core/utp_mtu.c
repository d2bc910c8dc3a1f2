/*
 * utp_mtu.c -- packet size: the application's GET_UDP_MTU, probing for a
 * larger size with DONTFRAG (RFC 4821 style binary search), shrinking on
 * ICMP fragmentation-needed and on black holes.
 *
 * mtu_cur is the UDP payload of a full packet.  When the application allows
 * more than the safe default (1402 bytes over IPv4, 1232 over IPv6), we start
 * at the default and probe upward; probes are ordinary data packets whose
 * first transmission carries UTP_UDP_DONTFRAG, retransmitted without it.
 */
#include "utp_internal.h"

/* Smallest UDP payload we ever use: a header with the longest SACK, plus
 * payload.  ICMP may claim anything; a smaller path fragments instead. */
#define UTP_MIN_MTU 296
#define UTP_MAX_MTU 65507
#define PROBE_DONE_GAP 32

static int is_v6(const utp_socket *s) { return s->addr.ss_family == AF_INET6; }

void utp_mtu_init(utp_socket *s)
{
	utp_context *ctx = s->ctx;
	uint64 ceiling = utp_cb(ctx, UTP_GET_UDP_MTU, s, NULL, 0);
	uint32 safe = is_v6(s) ? 1232 : 1402;
	if (ceiling == 0)
		ceiling = safe;
	ceiling = UTP_MAX(ceiling, (uint64)UTP_MIN_MTU);
	ceiling = UTP_MIN(ceiling, (uint64)UTP_MAX_MTU);
	s->mtu_ceiling = (uint32)ceiling;
	s->mtu_floor = UTP_MIN(is_v6(s) ? 1232u : 548u, s->mtu_ceiling);
	s->mtu_cur = ctx->mtu_probing ? UTP_MIN(safe, s->mtu_ceiling) : s->mtu_ceiling;
	s->mtu_probe_size = 0;
	s->stats.mtu_guess = s->mtu_cur;
}

uint32 utp_mtu_probe_size(const utp_socket *s)
{
	if (!s->ctx->mtu_probing || s->mtu_probe_size != 0 || s->state != UTPKIT_SOCK_CONNECTED)
		return 0;
	if (s->mtu_ceiling <= s->mtu_cur + PROBE_DONE_GAP)
		return 0;
	return s->mtu_cur + (s->mtu_ceiling - s->mtu_cur + 1) / 2;
}

void utp_mtu_probe_acked(utp_socket *s, uint32 size)
{
	if (size > s->mtu_cur) {
		s->mtu_cur = size;
		utp_log(s->ctx, s, UTP_LOG_MTU, "mtu probe of %u acked; packet size %u", size, s->mtu_cur);
	}
	s->mtu_probe_size = 0;
	s->stats.mtu_guess = s->mtu_cur;
}

void utp_mtu_probe_lost(utp_socket *s, uint32 size)
{
	if (size > s->mtu_cur && size - 1 < s->mtu_ceiling)
		s->mtu_ceiling = size - 1;
	s->mtu_probe_size = 0;
	utp_log(s->ctx, s, UTP_LOG_MTU, "mtu probe of %u lost; ceiling %u", size, s->mtu_ceiling);
}

static void lower_ceiling(utp_socket *s, uint32 ceiling)
{
	uint32 before = s->mtu_cur;
	ceiling = UTP_MAX(ceiling, (uint32)UTP_MIN_MTU);
	if (ceiling < s->mtu_ceiling)
		s->mtu_ceiling = ceiling;
	if (s->mtu_cur > s->mtu_ceiling)
		s->mtu_cur = s->mtu_ceiling;
	if (s->mtu_floor > s->mtu_cur)
		s->mtu_floor = s->mtu_cur;
	s->stats.mtu_guess = s->mtu_cur;
	if (s->mtu_cur < before)
		utp_out_repacketize(s);
}

void utp_mtu_on_icmp(utp_socket *s, uint16 next_hop_mtu, uint16 seq_nr, int have_seq)
{
	uint32 overhead = is_v6(s) ? 48 : 28;  /* IP + UDP headers */
	uint32 ceiling;
	utp_outpkt *p;

	/* Routers have sent 0 and other nonsense here; any value is safe. */
	if (next_hop_mtu <= overhead + UTP_MIN_MTU / 2)
		ceiling = s->mtu_floor;
	else
		ceiling = next_hop_mtu - overhead;
	if (have_seq && s->mtu_probe_size && seq_nr == s->mtu_probe_seq) {
		utp_mtu_probe_lost(s, s->mtu_probe_size);
		ceiling = UTP_MIN(ceiling, s->mtu_ceiling);
	}
	lower_ceiling(s, ceiling);
	utp_log(s->ctx, s, UTP_LOG_MTU, "icmp fragmentation needed (next hop %u); packet size %u",
	        next_hop_mtu, s->mtu_cur);
	/* The packet the router refused is resent at once, without DONTFRAG. */
	if (have_seq && (s->state == UTPKIT_SOCK_CONNECTED || s->state == UTPKIT_SOCK_CLOSING) &&
	    seq_lt(s->acked_seq, seq_nr) && seq_lt(seq_nr, s->next_send)) {
		p = utp_ring_slot(&s->outbuf, seq_nr);
		if (p && p->seq_nr == seq_nr) {
			utp_out_mark_lost(s, p, 0);
			utp_out_flush(s);
			utp_timer_update(s);
		}
	}
}

/* Full-size packets keep timing out while the peer was reachable before:
 * fall back to the floor and search again (RFC 4821 black-hole detection). */
void utp_mtu_on_blackhole(utp_socket *s)
{
	if (s->mtu_cur <= s->mtu_floor)
		return;
	utp_log(s->ctx, s, UTP_LOG_MTU, "timeouts at packet size %u; falling back to %u", s->mtu_cur, s->mtu_floor);
	s->mtu_ceiling = s->mtu_cur - 1;
	s->mtu_cur = s->mtu_floor;
	s->mtu_probe_size = 0;
	s->stats.mtu_guess = s->mtu_cur;
	utp_out_repacketize(s);
}
