/*
 * utp_output.c -- the send side: retransmission buffer, packetisation,
 * transmission, ACK/SACK processing and loss recovery.
 *
 * Sequence space of the send side:
 *
 *     acked_seq | in flight or lost ... | next_send | queued ... | seq_nr
 *
 * Loss is detected three ways, so several holes are repaired per round trip
 * instead of waiting for a timeout (libutp repairs only on SACK evidence and
 * otherwise waits its 1 s timeout):
 *   - SACK: a packet with three later packets selectively acknowledged;
 *   - time (RACK, RFC 8985): a packet sent more than srtt + srtt/4 before a
 *     packet that has since been delivered;
 *   - three duplicate ACKs without SACK (RFC 5681), for peers without SACK.
 * A tail loss probe (RFC 8985) and the retransmission timeout (RFC 6298)
 * cover the rest.
 */
#include "utp_internal.h"

uint32 utp_out_payload_max(const utp_socket *s)
{
	return s->mtu_cur > UTP_HEADER_SIZE ? s->mtu_cur - UTP_HEADER_SIZE : 1;
}

static utp_outpkt *out_get(const utp_socket *s, uint16 seq)
{
	utp_outpkt *p = utp_ring_slot(&s->outbuf, seq);
	return p && p->seq_nr == seq ? p : NULL;
}

static utp_outpkt *pkt_alloc(utp_context *ctx, uint32 cap)
{
	utp_outpkt *p;
	int pooled = cap <= UTP_POOL_CAP;
	if (pooled && ctx->pool_n > 0) {
		p = ctx->pool[--ctx->pool_n];
	} else {
		p = malloc(sizeof *p + (pooled ? UTP_POOL_CAP : cap));
		if (p == NULL)
			return NULL;
	}
	memset(p, 0, offsetof(utp_outpkt, room));
	p->pooled = (uint8)pooled;
	p->cap = cap;
	return p;
}

static void pkt_free(utp_context *ctx, utp_outpkt *p)
{
	if (p == NULL)
		return;
	if (p->pooled) {
		if (ctx->pool == NULL)
			ctx->pool = malloc(UTP_POOL_MAX * sizeof *ctx->pool);
		if (ctx->pool != NULL && ctx->pool_n < UTP_POOL_MAX) {
			ctx->pool[ctx->pool_n++] = p;
			return;
		}
	}
	free(p);
}

void utp_pool_free(utp_context *ctx)
{
	while (ctx->pool_n > 0)
		free(ctx->pool[--ctx->pool_n]);
	free(ctx->pool);
	ctx->pool = NULL;
}

static void out_release(utp_socket *s, utp_outpkt *p)
{
	utp_ring_put(&s->outbuf, p->seq_nr, NULL);
	if (p->in_flight)
		s->cur_window -= p->payload;
	if (p->lost)
		s->lost_count--;
	if (p->sacked)
		s->sacked_count--;
	if (p->in_flight && p->payload < p->cap && !p->is_fin)
		s->small_in_flight--;
	s->queued_bytes -= p->payload;
	s->out_count--;
	pkt_free(s->ctx, p);
}

void utp_out_free_all(utp_socket *s)
{
	uint32 i;
	if (s->outbuf.slots)
		for (i = 0; i <= s->outbuf.mask; i++)
			pkt_free(s->ctx, s->outbuf.slots[i]);
	utp_ring_free(&s->outbuf);
	s->out_count = 0;
}

/* Drops a packet from the flight without forgetting it. */
static void leave_flight(utp_socket *s, utp_outpkt *p)
{
	if (!p->in_flight)
		return;
	p->in_flight = 0;
	s->cur_window -= p->payload;
	if (p->payload < p->cap && !p->is_fin)
		s->small_in_flight--;
}

static utp_outpkt *out_append(utp_socket *s, uint32 cap)
{
	utp_outpkt *p;
	uint32 span = (uint32)seq_dist(s->acked_seq, s->seq_nr) + 1;
	if (s->out_count + 1 >= UTP_OUTBUF_MAX ||
	    utp_ring_reserve(&s->outbuf, (uint16)(s->acked_seq + 1), span, UTP_OUTBUF_MAX) != 0)
		return NULL;
	p = pkt_alloc(s->ctx, cap);
	if (p == NULL)
		return NULL;
	p->seq_nr = s->seq_nr++;
	utp_ring_put(&s->outbuf, p->seq_nr, p);
	s->out_count++;
	return p;
}

/* Copies application bytes into packets: small writes fill the last packet
 * not yet sent, so they leave as full packets.  Returns bytes accepted. */
size_t utp_out_queue(utp_socket *s, const struct utp_iovec *iov, size_t n)
{
	size_t total = 0, i;
	for (i = 0; i < n; i++) {
		const byte *src = iov[i].iov_base;
		size_t left = iov[i].iov_len;
		while (left > 0) {
			utp_outpkt *p = NULL;
			size_t take;
			if (s->queued_bytes >= s->sndbuf) {
				s->want_writable = 1;
				return total;
			}
			if (s->seq_nr != s->next_send) {
				p = out_get(s, (uint16)(s->seq_nr - 1));
				if (p && (p->is_fin || p->payload >= p->cap))
					p = NULL;
			}
			if (p == NULL) {
				p = out_append(s, utp_out_payload_max(s));
				if (p == NULL) {
					s->want_writable = 1;
					return total;
				}
			}
			take = UTP_MIN(left, (size_t)(p->cap - p->payload));
			take = UTP_MIN(take, (size_t)(s->sndbuf - s->queued_bytes));
			memcpy(p->data + p->payload, src, take);
			p->payload += (uint32)take;
			s->queued_bytes += (uint32)take;
			src += take;
			left -= take;
			total += take;
		}
	}
	return total;
}

/* The packet size went down: cut again what was queued but never sent.
 * Its sequence numbers were never on the wire, so they can be reassigned;
 * packets already sent keep their size (and go without DONTFRAG). */
void utp_out_repacketize(utp_socket *s)
{
	uint32 cap = utp_out_payload_max(s), bytes = 0, n, off;
	uint16 seq;
	int fin = 0;
	byte *all;
	if (s->next_send == s->seq_nr)
		return;
	/* Nothing larger than the new size waiting: leave the queue alone. */
	n = 0;
	for (seq = s->next_send; seq != s->seq_nr; seq++) {
		utp_outpkt *p = out_get(s, seq);
		if (p && p->cap > cap)
			n++;
	}
	if (n == 0)
		return;
	for (seq = s->next_send; seq != s->seq_nr; seq++) {
		utp_outpkt *p = out_get(s, seq);
		if (p)
			bytes += p->payload;
	}
	all = malloc(bytes ? bytes : 1);
	if (all == NULL)
		return;  /* keep the old packets; they still go, just fragmented */
	off = 0;
	for (seq = s->next_send; seq != s->seq_nr; seq++) {
		utp_outpkt *p = out_get(s, seq);
		if (p == NULL)
			continue;
		if (p->is_fin)
			fin = 1;
		memcpy(all + off, p->data, p->payload);
		off += p->payload;
		out_release(s, p);
	}
	s->seq_nr = s->next_send;
	s->fin_queued = 0;
	for (off = 0; off < bytes;) {
		uint32 take = UTP_MIN(cap, bytes - off);
		utp_outpkt *p = out_append(s, cap);
		if (p == NULL)
			break;  /* cannot happen: we only freed entries */
		memcpy(p->data, all + off, take);
		p->payload = take;
		s->queued_bytes += take;
		off += take;
	}
	free(all);
	if (fin)
		utp_out_queue_fin(s);
}

int utp_out_queue_fin(utp_socket *s)
{
	utp_outpkt *p;
	if (s->fin_queued)
		return 0;
	p = out_append(s, 0);
	if (p == NULL)
		return UTP_ERR_NOMEM;
	p->is_fin = 1;
	s->fin_queued = 1;
	return 0;
}

/* ---- transmission ---------------------------------------------------------------- */

static uint32 pto_us(const utp_socket *s)
{
	/* RFC 8985 7.2: two round trips, plus the peer's ACK delay allowance. */
	return 2 * s->srtt + s->ctx->ack_delay_ms * 1000u;
}

/* Sends a STATE, SYN or DATA/FIN packet.  For STATE and SYN p is NULL.
 * probe > 0 pads the datagram to that many bytes and sends it with
 * DONTFRAG (an MTU probe). */
static void transmit_probe(utp_socket *s, int type, utp_outpkt *p, uint16 seq, uint32 probe)
{
	utp_context *ctx = s->ctx;
	byte *buf = ctx->scratch;
	byte sack[UTP_SACK_MAX_BYTES];
	uint32 sack_len = 0, wnd = utp_in_window(s), payload = p ? p->payload : 0, flags = 0;
	uint16 conn_id = type == ST_SYN ? s->recv_id : s->send_id;
	size_t hlen;

	if (type != ST_SYN && s->reorder_count > 0) {
		sack_len = utp_in_build_sack(s, sack);
		/* A full data packet has no room for a long bitmap; the ACK stays
		 * pending and a STATE packet carries it. */
		if (p && UTP_HEADER_SIZE + 2 + sack_len + payload > UTP_MAX(s->mtu_cur, p->cap + UTP_HEADER_SIZE))
			sack_len = 0;
	}
	if (p != NULL && probe == 0) {
		/* The usual case: the header goes into the room in front of the
		 * payload and the datagram leaves straight from the buffer. */
		byte hdr[UTP_HEADROOM];
		hlen = utp_packet_write_header(hdr, type, conn_id, (uint32)ctx->now, s->reply_micro, wnd, seq,
		                               s->ack_nr, sack, sack_len);
		buf = (byte *)p + offsetof(utp_outpkt, data) - hlen;
		memcpy(buf, hdr, hlen);
	} else {
		hlen = utp_packet_write_header(buf, type, conn_id, (uint32)ctx->now, s->reply_micro, wnd, seq,
		                               type == ST_SYN ? 0 : s->ack_nr, sack, sack_len);
		if (probe > hlen + payload + 1 && probe + hlen <= sizeof ctx->scratch) {
			hlen = utp_packet_add_padding(buf, hlen, probe - hlen - payload);
			flags = UTP_UDP_DONTFRAG;
		}
		if (payload)
			memcpy(buf + hlen, p->data, payload);
	}
	s->last_send = ctx->now;
	s->stats.nxmit++;
	s->stats.nbytes_xmit += payload;
	if (type != ST_SYN && (s->reorder_count == 0 || sack_len > 0)) {
		/* This packet carries our complete ACK state. */
		s->ack_pending = 0;
		s->ack_due = 0;
		s->bytes_since_ack = 0;
		s->last_adv_wnd = wnd;
	}
	utp_send_datagram(ctx, (struct sockaddr *)&s->addr, s->addrlen, buf, hlen + payload, flags);
}

static void transmit(utp_socket *s, int type, utp_outpkt *p, uint16 seq)
{
	transmit_probe(s, type, p, seq, 0);
}

static void send_data_as(utp_socket *s, utp_outpkt *p, int zwp)
{
	utp_context *ctx = s->ctx;
	uint32 probe = 0;
	if (p->transmissions == 0) {
		s->next_send = (uint16)(p->seq_nr + 1);
		/* An MTU probe is an ordinary full packet padded up to the size
		 * being tried: if it is lost, the same packet goes again unpadded,
		 * so a path that eats big datagrams costs one retransmission. */
		if (!zwp && p->payload == p->cap && !p->is_fin && (probe = utp_mtu_probe_size(s)) != 0) {
			p->is_probe = 1;
			s->mtu_probe_size = probe;
			s->mtu_probe_seq = p->seq_nr;
		}
	} else {
		if (p->lost_by_timeout)
			s->stats.rexmit++;
		else
			s->stats.fastrexmit++;
	}
	if (p->lost) {
		p->lost = 0;
		s->lost_count--;
	}
	p->lost_by_timeout = 0;
	p->transmissions++;
	p->time_sent = ctx->now;
	if (!p->in_flight) {
		p->in_flight = 1;
		s->cur_window += p->payload;
		if (p->payload < p->cap && !p->is_fin)
			s->small_in_flight++;
	}
	p->zwp = (uint8)zwp;
	if (zwp) {
		s->zwp_pending = 1;
		s->zwp_seq = p->seq_nr;
	}
	transmit_probe(s, p->is_fin ? ST_FIN : ST_DATA, p, p->seq_nr, probe);
	if (s->rto_deadline == 0)
		s->rto_deadline = ctx->now + s->rto;
	if (s->rtt_valid && !s->tlp_sent && s->tlp_deadline == 0 && !zwp)
		s->tlp_deadline = ctx->now + pto_us(s);
	if (!zwp)
		s->zwp_deadline = 0;
}

static void send_data(utp_socket *s, utp_outpkt *p)
{
	send_data_as(s, p, 0);
}

static utp_outpkt *first_lost(const utp_socket *s)
{
	uint16 seq;
	if (s->lost_count == 0)
		return NULL;
	for (seq = (uint16)(s->acked_seq + 1); seq != s->next_send; seq++) {
		utp_outpkt *p = out_get(s, seq);
		if (p && p->lost)
			return p;
	}
	return NULL;
}

/* Sends what the windows allow: retransmissions first, then new packets. */
void utp_out_flush(utp_socket *s)
{
	uint64 wait;
	s->pace_deadline = 0;
	if (s->state != UTPKIT_SOCK_CONNECTED && s->state != UTPKIT_SOCK_CLOSING)
		return;
	if (s->is_acceptor && !s->confirmed && !s->speak_unconfirmed) {
		/* The acceptor's data waits until the initiator shows it has our
		 * SYN-ACK (any packet after its SYN).  Data reaching an initiator
		 * still waiting for the SYN-ACK completes libtorrent's handshake
		 * but loses its payload (it takes the DATA for the SYN-ACK and
		 * marks its sequence number received), and libutp's acceptor
		 * never speaks first at all.  Meanwhile the SYN-ACK is repeated
		 * (utp_socket.c), which also repairs a lost one. */
		if (s->syn_deadline == 0 && s->next_send != s->seq_nr) {
			s->syn_tries = 0;
			s->syn_deadline = s->ctx->now + (uint64)s->ctx->syn_timeout_ms * 1000u;
		}
		return;
	}
	while (!s->zombie) {
		utp_outpkt *p = first_lost(s);
		if (p == NULL) {
			if (s->next_send == s->seq_nr)
				break;
			p = out_get(s, s->next_send);
			if (p == NULL)
				break;
			if (seq_dist(s->acked_seq, p->seq_nr) > UTP_WINDOW_PACKETS_MAX)
				break;  /* beyond the peer's reorder buffer */
			/* Coalescing: a partial packet that is still the last one waits
			 * while another partial packet is in flight (Nagle, with
			 * Minshall's refinement), so a stream of small writes leaves as
			 * full packets while a lone request still goes at once. */
			if (!p->is_fin && p->payload < p->cap && p->seq_nr == (uint16)(s->seq_nr - 1) &&
			    s->small_in_flight > 0 && !s->shut_wr && !s->app_closed)
				break;
		}
		/* The congestion window always admits one packet, and packets
		 * found lost from ACKs: they left the flight when marked, so
		 * resending them never takes it past what it was before the loss.
		 * The window cut acts on new data; holding repairs back for it would
		 * deadlock when the flight is full of packets the receiver holds but
		 * cannot show (libutp's SACK covers 30 packets past the hole).  After
		 * a timeout the window restarts from one packet for everything. */
		if (s->cur_window > 0 && s->cur_window + p->payload > s->cwnd && !(p->lost && !p->lost_by_timeout))
			break;
		if (s->cur_window + p->payload > s->peer_wnd) {
			if (s->cur_window == 0 && s->zwp_deadline == 0) {
				/* Zero window: the reader's window update normally reopens
				 * it; a probe now and then covers a lost update. */
				if (s->zwp_interval == 0)
					s->zwp_interval = UTP_MAX(s->rto, 200000u);
				s->zwp_deadline = s->ctx->now + s->zwp_interval;
			}
			break;
		}
		/* What the windows admit leaves in bursts spread over the round
		 * trip, not all at once into the receiver's socket buffer; the
		 * engine's timer (utpkit_next_timeout) says when the next may go. */
		if ((wait = utp_pace_wait(s, p->payload)) != 0) {
			s->pace_deadline = wait;
			break;
		}
		utp_pace_consume(s, p->payload);
		send_data(s, p);
	}
}

/* Zero-window probe: one packet regardless of the receiver's window; its
 * ACK brings the current window. */
void utp_out_flush_probe(utp_socket *s)
{
	utp_outpkt *p;
	if (s->state != UTPKIT_SOCK_CONNECTED && s->state != UTPKIT_SOCK_CLOSING)
		return;
	if (s->cur_window > 0)
		return;
	p = first_lost(s);
	if (p == NULL && s->next_send != s->seq_nr)
		p = out_get(s, s->next_send);
	if (p) {
		send_data_as(s, p, 1);
		s->zwp_interval = UTP_MIN(2 * s->zwp_interval, 4000000u);
	}
}

void utp_out_send_ack(utp_socket *s)
{
	if (s->state != UTPKIT_SOCK_CONNECTED && s->state != UTPKIT_SOCK_CLOSING) {
		s->ack_pending = 0;
		s->ack_due = 0;
		return;
	}
	s->ack_pending = 0;
	transmit(s, ST_STATE, NULL, s->next_send);
	s->ack_pending = 0;
	s->ack_due = 0;
	utp_timer_update(s);
}

/* The acceptor's reply to a SYN.  Its seq_nr tells the initiator where our
 * data starts; until the initiator has confirmed, a repeated reply (to a
 * repeated SYN) must say the same even if data has been sent since. */
void utp_out_send_synack(utp_socket *s)
{
	if (s->confirmed) {
		utp_out_send_ack(s);
		return;
	}
	s->ack_pending = 0;
	transmit(s, ST_STATE, NULL, s->isn);
	s->ack_due = 0;
	utp_timer_update(s);
}

void utp_out_send_syn(utp_socket *s)
{
	utp_context *ctx = s->ctx;
	uint64 wait = (uint64)ctx->syn_timeout_ms * 1000u << UTP_MIN(s->syn_tries, 20u);
	transmit(s, ST_SYN, NULL, s->syn_seq);
	s->syn_deadline = ctx->now + wait;
}

/* A zero-length DATA packet carrying an old, acknowledged sequence number:
 * peers answer duplicates with an ACK, and it consumes no sequence space. */
void utp_out_send_keepalive(utp_socket *s)
{
	transmit(s, ST_DATA, NULL, (uint16)(s->next_send - 1));
}

void utp_out_maybe_writable(utp_socket *s)
{
	if (!s->want_writable || s->state != UTPKIT_SOCK_CONNECTED || s->shut_wr || s->app_closed)
		return;
	/* Hysteresis: WRITABLE once half the send buffer is free, so a writer
	 * is woken once per half buffer rather than once per packet acked. */
	if (s->queued_bytes > s->sndbuf / 2 || s->out_count + 2 >= UTP_OUTBUF_MAX / 2)
		return;
	s->want_writable = 0;
	utp_state_change(s, UTP_STATE_WRITABLE);
}

/* ---- loss detection -------------------------------------------------------------- */

void utp_out_mark_lost(utp_socket *s, utp_outpkt *p, int by_timeout)
{
	if (p->lost || p->sacked || p->transmissions == 0)
		return;
	leave_flight(s, p);
	p->lost = 1;
	p->lost_by_timeout = (uint8)by_timeout;
	s->lost_count++;
	if (p->is_probe && p->transmissions == 1 && s->mtu_probe_size && p->seq_nr == s->mtu_probe_seq)
		utp_mtu_probe_lost(s, s->mtu_probe_size);
}

/* RACK (RFC 8985) plus the SACK count: a packet not delivered is lost when
 * one sent after it was delivered (cumulatively or selectively) and a
 * round trip plus the reordering window has passed since it was sent, or,
 * sent once, when dupthresh packets above it were SACKed.  Deliveries the
 * receiver's bitmap cannot show (libutp's covers only 30 packets after the
 * hole) still move rack_xmit_ts, so a burst of drops at a full socket
 * buffer is repaired within a round trip or two instead of by a timeout.
 *
 * The head rule: an ACK that arrives well over two round trips after the
 * first unacknowledged packet was (re)sent, without acknowledging it, says
 * it was lost.  A retransmission dropped again by a still-full socket buffer is
 * otherwise invisible -- nothing sent after it may have got through, and
 * libutp's bitmap does not show what did -- and only the timeout would
 * find it. */
void utp_out_detect_losses(utp_socket *s, int on_ack)
{
	uint16 seq;
	uint32 sacked_seen = 0, reo, run = 0, longest_run = 0;
	uint64 now = s->ctx->now;
	int lost = 0, head = on_ack && s->peer_sacks;

	s->reorder_deadline = 0;
	if (!s->rtt_valid || (s->sacked_count == 0 && s->rack_xmit_ts == 0 && !head))
		return;
	reo = UTP_MAX(s->srtt / 4 * s->reo_wnd_mult, 1000u);
	for (seq = (uint16)(s->acked_seq + 1); seq != s->next_send; seq++) {
		utp_outpkt *p = out_get(s, seq);
		uint32 sacked_above;
		if (p == NULL)
			continue;
		if (p->sacked) {
			sacked_seen++;
			run = 0;
			continue;
		}
		if (head) {
			head = 0;
			/* Well over: a probe timeout (two round trips) plus the
			 * variation, so a receiver slow to answer (a busy reader, a
			 * deferred ACK) is not taken for a loss. */
			if (!p->lost && p->transmissions > 0 &&
			    now >= p->time_sent + 2 * (uint64)s->srtt + 4 * (uint64)s->rttvar + reo) {
				utp_out_mark_lost(s, p, 0);
				lost = 1;
				continue;
			}
		}
		/* Packets sent first after the newest delivered one, and all after
		 * them, cannot be judged yet (unless SACKs above them count). */
		sacked_above = s->sacked_count - sacked_seen;
		if (sacked_above == 0 && ((p->transmissions == 1 && p->time_sent >= s->rack_xmit_ts) ||
		                          !seq_le(p->seq_nr, s->sack_limit)))
			break;
		if (p->lost) {
			run++;
			continue;
		}
		if (p->time_sent >= s->rack_xmit_ts) {
			run = 0;
			continue;
		}
		/* The time rule judges only what the peer's last ACK reported on:
		 * past its bitmap the receiver may hold packets it cannot show. */
		if ((p->transmissions == 1 && sacked_above >= s->dupthresh) ||
		    (now >= p->time_sent + s->srtt + reo && seq_le(p->seq_nr, s->sack_limit))) {
			utp_out_mark_lost(s, p, 0);
			lost = 1;
			if (p->transmissions == 1 && ++run > longest_run)
				longest_run = run;
		} else if (seq_le(p->seq_nr, s->sack_limit)) {
			uint64 due = p->time_sent + s->srtt + reo;
			run = 0;
			if (s->reorder_deadline == 0 || due < s->reorder_deadline)
				s->reorder_deadline = due;
		}
	}
	if (lost) {
		if (longest_run >= UTP_BURST_LOSS_RUN)
			utp_pace_on_burst_loss(s, longest_run);
		utp_cc_on_loss(s);
	}
}

/* ---- ACK processing -------------------------------------------------------------- */

/* A retransmission acknowledged sooner than half the shortest round trip
 * cannot have been the one that arrived: the original was only late
 * (reordered).  Undo the window cut it caused and tolerate more reordering. */
static void check_spurious(utp_socket *s, const utp_outpkt *p, uint64 now)
{
	/* Nothing can be acknowledged sooner than the shortest round trip seen. */
	if (p->transmissions < 2 || s->min_rtt == 0 || p->zwp || now - p->time_sent >= s->min_rtt)
		return;
	s->spurious++;
	if (s->dupthresh < 64)
		s->dupthresh *= 2;
	if (s->reo_wnd_mult < 4)
		s->reo_wnd_mult++;
	utp_cc_undo(s);
}

/* A packet sent once is acknowledged after later ones were SACKed: it was
 * reordered, not lost.  Tolerate that much reordering from now on (RFC 8985
 * 6.2: RACK.reord), so the next time it is not taken for loss. */
static void check_reordered(utp_socket *s, const utp_outpkt *p)
{
	uint32 extent;
	if (p->transmissions != 1 || s->sacked_count == 0 || !seq_lt(p->seq_nr, s->highest_sacked))
		return;
	s->reordered++;
	extent = seq_dist(p->seq_nr, s->highest_sacked);
	if (extent + 1 > s->dupthresh)
		s->dupthresh = UTP_MIN(extent + 1, 128u);
	if (s->reo_wnd_mult < 4)
		s->reo_wnd_mult++;
}

/* A packet was delivered: its send time is RACK's reference, unless it was
 * a retransmission acknowledged too soon to be the copy that arrived. */
static void rack_update(utp_socket *s, const utp_outpkt *p, uint64 now)
{
	if (p->transmissions > 1 && now - p->time_sent < s->min_rtt)
		return;
	if (p->time_sent > s->rack_xmit_ts)
		s->rack_xmit_ts = p->time_sent;
}

/* The SACK bitmap is there (the receiver holds data past a hole) but shows
 * nothing we sent: what it holds lies past the bitmap's end.  So the first
 * packet past the end, or one after it, was delivered; the earliest such
 * send time is the first packet's, if it went only once. */
static void rack_beyond_bitmap(utp_socket *s, const utp_packet *pk, uint64 now)
{
	uint16 beyond = (uint16)(pk->ack_nr + 2 + pk->sack_len * 8);
	utp_outpkt *p;
	if (!seq_lt(s->acked_seq, beyond) || !seq_lt(beyond, s->next_send))
		return;
	p = out_get(s, beyond);
	if (p != NULL && p->transmissions == 1 && !p->lost)
		rack_update(s, p, now);
}

/* Returns UTP_ERR_MALFORMED when the packet acknowledges sequence numbers we
 * never sent: nothing in such a packet is trusted. */
int utp_out_on_ack(utp_socket *s, const utp_packet *pk)
{
	utp_context *ctx = s->ctx;
	uint64 now = ctx->now;
	uint32 outstanding = (uint32)seq_dist(s->acked_seq, s->next_send) - 1;
	uint32 acked_new = seq_dist(s->acked_seq, pk->ack_nr);
	uint32 flight_before = s->cur_window, bytes_acked = 0, rtt = 0, i;
	int have_rtt = 0;

	if (acked_new > outstanding) {
		/* Acknowledges something we never sent (forged, or a confused
		 * peer): drop the packet.  An old ACK overtaken by newer ones
		 * (reordering) says nothing new for the send side. */
		if (acked_new < 0x8000) {
			ctx->counters.drop_invalid++;
			return UTP_ERR_MALFORMED;
		}
		return 0;
	}
	s->peer_wnd = pk->wnd;
	if (pk->sack)
		s->peer_sacks = 1;
	/* A peer that never sent a SACK tells nothing about what it holds past
	 * the first hole: judge every packet by time (no limit). */
	s->sack_limit = s->peer_sacks ? (uint16)(pk->ack_nr + 1 + (pk->sack ? pk->sack_len * 8 : 0))
	                              : (uint16)(s->next_send - 1);

	for (i = 0; i < acked_new; i++) {
		utp_outpkt *p = out_get(s, (uint16)(s->acked_seq + 1));
		s->acked_seq++;
		if (p == NULL)
			continue;
		/* Karn: only packets sent once give a sample, and not those already
		 * SACKed (their ACK waited for a hole to be repaired). */
		if (!p->sacked) {
			bytes_acked += p->payload;
			if (p->transmissions == 1) {
				rtt = (uint32)(now - p->time_sent);
				have_rtt = 1;
			}
		}
		check_spurious(s, p, now);
		if (!p->sacked) {
			check_reordered(s, p);
			rack_update(s, p, now);
		}
		if (p->is_fin)
			s->fin_acked = 1;
		if (p->is_probe && s->mtu_probe_size && p->seq_nr == s->mtu_probe_seq)
			utp_mtu_probe_acked(s, s->mtu_probe_size);
		out_release(s, p);
	}

	if (pk->sack) {
		uint32 nbits = pk->sack_len * 8, k, shown = 0, top = 0;
		for (k = 0; k < nbits; k++) {
			uint16 seq = (uint16)(pk->ack_nr + 2 + k);
			utp_outpkt *p;
			if (!seq_lt(seq, s->next_send))
				break;  /* bits past what we sent are ignored */
			if (!utp_sack_bit(pk->sack, pk->sack_len, k) || !seq_lt(s->acked_seq, seq))
				continue;
			shown++;
			top = k;
			p = out_get(s, seq);
			if (p == NULL || p->sacked)
				continue;
			check_reordered(s, p);
			rack_update(s, p, now);
			p->sacked = 1;
			if (s->sacked_count == 0 || seq_lt(s->highest_sacked, seq))
				s->highest_sacked = seq;
			s->sacked_count++;
			leave_flight(s, p);
			if (p->lost) {
				p->lost = 0;  /* it arrived after all */
				s->lost_count--;
			}
			bytes_acked += p->payload;
			if (p->transmissions == 1) {
				rtt = (uint32)(now - p->time_sent);
				have_rtt = 1;
			}
			check_spurious(s, p, now);
		}
		/* The time rule judges up to the bitmap's end, except that libutp's
		 * four bytes carry only 30 bits: its last two say nothing.  A
		 * bitmap showing nothing speaks of what lies past its end. */
		if (pk->sack_len == 4)
			s->sack_limit = (uint16)(s->sack_limit - 2);
		if (shown == 0)
			rack_beyond_bitmap(s, pk, now);
		else if (seq_lt(s->sack_limit, (uint16)(pk->ack_nr + 2 + top)))
			s->sack_limit = (uint16)(pk->ack_nr + 2 + top);
	}

	if (have_rtt)
		utp_rtt_sample(s, rtt);
	/* Every packet's timestamp_difference is a delay sample of our packets,
	 * including the reply to our SYN, sent before any data could queue:
	 * flows started together all see the empty queue for their base. */
	if (pk->ts_diff != 0) {
		utp_delay_add(&s->our_hist, pk->ts_diff, now);
		if (ctx->callbacks[UTP_ON_DELAY_SAMPLE]) {
			utp_callback_arguments a;
			memset(&a, 0, sizeof a);
			a.callback_type = UTP_ON_DELAY_SAMPLE;
			a.socket = s;
			a.sample_ms = (int)(pk->ts_diff / 1000u);
			utp_cb_args(ctx, &a);
		}
	}

	if (acked_new > 0) {
		s->dup_acks = 0;
		s->consecutive_timeouts = 0;
		s->rto = utp_rto_base(s);
		s->tlp_sent = 0;
		if (s->next_send == (uint16)(s->acked_seq + 1)) {
			s->rto_deadline = 0;
			s->tlp_deadline = 0;
		} else {
			s->rto_deadline = now + s->rto;
			s->tlp_deadline = s->rtt_valid ? now + pto_us(s) : 0;
		}
		if (s->in_recovery && !seq_lt(s->acked_seq, s->recovery_seq))
			s->in_recovery = 0;
	} else if (pk->type == ST_STATE && pk->sack == NULL && outstanding > 0 && pk->ack_nr == s->acked_seq) {
		/* RFC 5681 duplicate ACK, for peers that send no SACK. */
		if (++s->dup_acks == 3) {
			utp_outpkt *p = out_get(s, (uint16)(s->acked_seq + 1));
			if (p) {
				utp_out_mark_lost(s, p, 0);
				utp_cc_on_loss(s);
			}
		}
	}

	if (s->zwp_pending) {
		/* Whatever this ACK says, the zero-window probe was answered: if it
		 * is still unacknowledged the receiver dropped it for want of
		 * room.  That is flow control, not congestion: no window cut, and
		 * it goes again as soon as the window allows. */
		utp_outpkt *p = out_get(s, s->zwp_seq);
		s->zwp_pending = 0;
		if (p && p->zwp && !p->sacked && p->transmissions > 0) {
			p->zwp = 0;
			leave_flight(s, p);
			if (!p->lost) {
				p->lost = 1;
				s->lost_count++;
			}
			if (s->next_send == (uint16)(s->acked_seq + 1) || s->cur_window == 0)
				s->rto_deadline = 0;
		}
	}
	if (s->peer_wnd >= utp_out_payload_max(s))
		s->zwp_interval = 0;
	if (s->next_send != (uint16)(s->acked_seq + 1))
		utp_out_detect_losses(s, 1);
	if (bytes_acked > 0) {
		utp_cc_on_ack(s, bytes_acked, flight_before);
		utp_pace_on_ack(s, bytes_acked);
	}
	if (s->fin_acked)
		utp_socket_maybe_finish(s);
	return 0;
}

/* ---- timers ------------------------------------------------------------------------ */

void utp_out_on_rto(utp_socket *s)
{
	utp_context *ctx = s->ctx;
	uint16 seq;
	int first;

	s->rto_deadline = 0;
	s->tlp_deadline = 0;
	if (s->next_send == (uint16)(s->acked_seq + 1))
		return;
	s->timeouts++;
	/* Dead peer: timeouts in a row with nothing at all heard in between
	 * (any packet from the peer resets the count). */
	if (++s->consecutive_timeouts > ctx->dead_retries) {
		utp_socket_fail(s, UTP_ETIMEDOUT);
		return;
	}
	if (s->peer_wnd < utp_out_payload_max(s)) {
		/* The receiver's window is closed: what timed out was a window
		 * probe, not a congested path.  Counted for dead-peer detection
		 * (nothing was heard), but no window cut. */
		s->zwp_pending = 0;
	} else {
		if (s->consecutive_timeouts >= 4)
			utp_mtu_on_blackhole(s);
		utp_cc_on_timeout(s);
	}
	/* Nothing in flight is known to have arrived any more, but only the
	 * first packet is resent now.  The receiver may well hold the rest (a
	 * full socket buffer drops a run of packets, not all after it; libutp's
	 * SACK shows only 30 packets past the hole): its ACK of this one then
	 * covers them, or RACK marks lost, against this retransmission, what it
	 * still lacks.  Resending the whole window into the same full buffer
	 * would only repeat the loss. */
	first = 1;
	for (seq = (uint16)(s->acked_seq + 1); seq != s->next_send; seq++) {
		utp_outpkt *p = out_get(s, seq);
		if (p == NULL || p->sacked)
			continue;
		leave_flight(s, p);
		/* Without SACKs from the peer nothing would later show what it
		 * lacks: go back N. */
		if (first || !s->peer_sacks)
			utp_out_mark_lost(s, p, 1);
		first = 0;
	}
	utp_rto_backoff(s);
	s->dup_acks = 0;
	utp_out_flush(s);
	if (s->rto_deadline == 0 && s->next_send != (uint16)(s->acked_seq + 1))
		s->rto_deadline = ctx->now + s->rto;
}

/* Tail loss probe: no ACK for two round trips.  Send new data if there is
 * some, else resend the last packet, so the peer's ACK (with SACK) shows
 * what was lost without waiting for the retransmission timeout. */
void utp_out_on_tlp(utp_socket *s)
{
	uint16 seq;
	s->tlp_deadline = 0;
	if (s->tlp_sent || s->next_send == (uint16)(s->acked_seq + 1))
		return;
	s->tlp_sent = 1;
	if (s->next_send != s->seq_nr && s->cur_window + utp_out_payload_max(s) <= s->peer_wnd) {
		utp_outpkt *p = out_get(s, s->next_send);
		if (p) {
			send_data(s, p);
			return;
		}
	}
	for (seq = (uint16)(s->next_send - 1); seq != s->acked_seq; seq--) {
		utp_outpkt *p = out_get(s, seq);
		if (p && !p->sacked) {
			leave_flight(s, p);
			if (!p->lost) {
				p->lost = 1;
				s->lost_count++;
			}
			send_data(s, p);
			return;
		}
	}
}
