/*
 * utp_input.c -- the receive side: per-packet processing for a known
 * connection, the reorder buffer, in-order delivery, FIN and the SACK bitmap.
 */
#include "utp_internal.h"

static utp_inpkt *in_get(const utp_socket *s, uint16 seq)
{
	utp_inpkt *q = utp_ring_slot(&s->inbuf, seq);
	return q && q->seq_nr == seq ? q : NULL;
}

void utp_in_free_all(utp_socket *s)
{
	uint32 i;
	if (s->inbuf.slots)
		for (i = 0; i <= s->inbuf.mask; i++)
			free(s->inbuf.slots[i]);
	utp_ring_free(&s->inbuf);
	s->reorder_count = 0;
	s->reorder_bytes = 0;
}

/* Advertised window: what the application and the reorder buffer leave
 * free of the receive buffer (GET_READ_BUFFER_SIZE reports what the
 * application still holds), as libtorrent's receiver advertises it.  The
 * reorder buffer must be subtracted: libtorrent's sender (like ours) counts
 * selectively acked packets as no longer in flight, so with a hole at
 * ack_nr a window that ignored the reorder buffer let it run a whole
 * receive buffer past the last SACKed packet; over_budget() then dropped
 * what did not fit, unacknowledged, and each such packet cost libtorrent a
 * timeout and a transmission.  libtorrent gives a packet three
 * transmissions (utp_num_resends) before it times the connection out, so
 * these drops, on top of the lab's loss, killed the connection (interop
 * lab at 2% loss: 49 of 68 packets sent three times had had a copy
 * dropped here).  A zero window does not stop libtorrent from resending
 * the hole: fast and timeout resends ignore the window. */
uint32 utp_in_window(utp_socket *s)
{
	uint64 used = utp_cb(s->ctx, UTP_GET_READ_BUFFER_SIZE, s, NULL, 0) + s->reorder_bytes;
	uint32 wnd = used >= s->rcvbuf ? 0 : (uint32)(s->rcvbuf - used);
	/* The reorder buffer also holds at most UTP_REORDER_MAX packets past
	 * ack_nr: with small packets (libtorrent lowers its MTU after losses)
	 * the byte window alone would let the sender run past that -- also
	 * from an empty reorder buffer, if a hole opens behind the window just
	 * advertised -- and see packets dropped after they arrived, which
	 * libtorrent cannot afford (seen in the lab with 907-byte packets). */
	if (s->in_seg > 0) {
		uint32 span = s->reorder_count > 0 ? (uint32)seq_dist(s->ack_nr, s->reorder_top) : 0;
		uint64 cap = span + 1 >= UTP_REORDER_MAX ? 0 : (uint64)(UTP_REORDER_MAX - 1 - span) * s->in_seg;
		if (cap < wnd)
			wnd = (uint32)cap;
	}
	return wnd;
}

uint32 utp_in_build_sack(utp_socket *s, byte *out)
{
	uint32 bits, bytes, k;
	if (s->reorder_count == 0)
		return 0;
	bits = (uint32)seq_dist((uint16)(s->ack_nr + 2), s->reorder_top) + 1;
	bytes = ((bits + 31) / 32) * 4;
	if (bytes > UTP_SACK_MAX_BYTES)
		bytes = UTP_SACK_MAX_BYTES;
	memset(out, 0, bytes);
	for (k = 0; k < bits && k < bytes * 8; k++)
		if (in_get(s, (uint16)(s->ack_nr + 2 + k)))
			out[k / 8] |= (byte)(1u << (k % 8));
	return bytes;
}

static void deliver(utp_socket *s, const byte *data, size_t len)
{
	s->stats.nbytes_recv += len;
	if (len == 0 || s->app_closed || s->shut_rd || s->zombie)
		return;
	utp_cb(s->ctx, UTP_ON_READ, s, data, len);
}

static void check_eof(utp_socket *s)
{
	if (s->got_fin && s->ack_nr == s->eof_seq && !s->eof_reported && !s->zombie) {
		s->eof_reported = 1;
		if (!s->app_closed)
			utp_state_change(s, UTP_STATE_EOF);
	}
}

/* Delivers everything now in order from the reorder buffer. */
static void drain_reorder(utp_socket *s)
{
	while (s->reorder_count > 0 && !s->zombie) {
		uint16 next = (uint16)(s->ack_nr + 1);
		utp_inpkt *q = in_get(s, next);
		if (q == NULL)
			break;
		utp_ring_put(&s->inbuf, next, NULL);
		s->reorder_count--;
		s->reorder_bytes -= q->len;
		s->ack_nr = next;
		if (!q->is_fin)
			deliver(s, q->data, q->len);
		free(q);
	}
	if (s->reorder_count == 0)
		s->reorder_top = s->ack_nr;
}

static int over_budget(utp_socket *s, uint16 d, size_t len)
{
	uint64 slack = 2 * (uint64)s->mtu_cur;
	if (d == 0)
		return utp_cb(s->ctx, UTP_GET_READ_BUFFER_SIZE, s, NULL, 0) > s->rcvbuf + slack;
	return (uint64)s->reorder_bytes + len > s->rcvbuf + slack;
}

static void on_data(utp_socket *s, const utp_packet *pk)
{
	utp_context *ctx = s->ctx;
	uint16 d = seq_dist((uint16)(s->ack_nr + 1), pk->seq_nr);
	int is_fin = pk->type == ST_FIN;
	size_t len = is_fin ? 0 : pk->payload_len;

	if (s->app_closed && len > 0 && d < 0x8000) {
		/* New data for a socket the application closed can never be read:
		 * like TCP, answer with RESET so the sender learns at once
		 * (UTP_ECONNRESET) instead of filling a buffer nobody drains. */
		utp_send_reset_to(ctx, (struct sockaddr *)&s->addr, s->addrlen, s->send_id, s->ack_nr, 0);
		utp_socket_destroy_later(s);
		return;
	}
	if (d >= 0x8000) {
		/* Already received: our ACK was lost, or this is a keepalive probe. */
		s->stats.nduprecv++;
		utp_ack_defer(s);
		return;
	}
	if (d >= UTP_REORDER_MAX || (s->got_fin && seq_lt(s->eof_seq, pk->seq_nr)) ||
	    (is_fin && s->got_fin && s->eof_seq != pk->seq_nr)) {
		ctx->counters.drop_invalid++;
		return;
	}
	/* Flow control: a peer that ignores our window could make us buffer
	 * without bound.  The application's unread bytes and the reorder buffer
	 * are each held to the receive buffer size (plus slack for probes); the
	 * packet that fills the first hole is always taken, since it lets the
	 * reorder buffer drain. */
	if (len > 0 && over_budget(s, d, len)) {
		ctx->counters.drop_invalid++;
		utp_ack_defer(s);
		return;
	}
	if (is_fin) {
		s->got_fin = 1;
		s->eof_seq = pk->seq_nr;
	}
	s->bytes_since_ack += (uint32)len;
	if (len > s->in_seg / 2)
		s->in_seg = (uint32)len;   /* follows the peer's MTU, ignores short tails */

	if (d == 0) {
		s->ack_nr = pk->seq_nr;
		if (!is_fin)
			deliver(s, pk->payload, len);
		drain_reorder(s);
		check_eof(s);
	} else {
		utp_inpkt *q;
		if (in_get(s, pk->seq_nr) != NULL) {
			s->stats.nduprecv++;
			utp_ack_defer(s);
			return;
		}
		if (utp_ring_reserve(&s->inbuf, (uint16)(s->ack_nr + 1), (uint32)d + 1, 2 * UTP_REORDER_MAX) != 0 ||
		    (q = malloc(sizeof *q + len)) == NULL) {
			ctx->counters.drop_invalid++;
			return;
		}
		q->len = (uint32)len;
		q->seq_nr = pk->seq_nr;
		q->is_fin = (uint8)is_fin;
		memcpy(q->data, pk->payload, len);
		utp_ring_put(&s->inbuf, pk->seq_nr, q);
		if (s->reorder_count == 0 || seq_lt(s->reorder_top, pk->seq_nr))
			s->reorder_top = pk->seq_nr;
		s->reorder_count++;
		s->reorder_bytes += (uint32)len;
	}
	if (s->zombie)
		return;
	/* ACK at once after a few full packets; otherwise defer it to
	 * utp_issue_deferred_acks (one ACK per received batch) or the ACK timer. */
	if (s->bytes_since_ack >= 4 * utp_out_payload_max(s) || is_fin)
		utp_out_send_ack(s);
	else
		utp_ack_defer(s);
}

static void on_connected(utp_socket *s, const utp_packet *pk)
{
	utp_context *ctx = s->ctx;
	s->state = UTPKIT_SOCK_CONNECTED;
	s->ack_nr = (uint16)(pk->seq_nr - 1);
	s->syn_deadline = 0;
	/* The third leg of the handshake: it tells the acceptor we have its
	 * SYN-ACK, so data it holds for us may go (utp_out_flush).  Deferred
	 * to the end of the batch: data written meanwhile carries it instead. */
	utp_ack_defer(s);
	if (s->syn_tries == 0)
		utp_rtt_sample(s, (uint32)(ctx->now - s->syn_sent));  /* Karn: only if sent once */
	s->want_writable = 0;
	if (ctx->callbacks[UTP_ON_CONNECT])
		utp_cb(ctx, UTP_ON_CONNECT, s, NULL, 0);
	if (!s->zombie)
		utp_state_change(s, UTP_STATE_CONNECT);
}

void utp_in_on_packet(utp_socket *s, const utp_packet *pk)
{
	utp_context *ctx = s->ctx;

	if (s->zombie || s->state == UTPKIT_SOCK_ERROR || s->state == UTPKIT_SOCK_IDLE) {
		ctx->counters.drop_invalid++;
		return;
	}
	if (pk->type == ST_RESET) {
		if (s->state == UTPKIT_SOCK_SYN_SENT) {
			/* A RESET answering our SYN means nobody accepts here. */
			if (pk->ack_nr == s->syn_seq)
				utp_socket_fail(s, UTP_ECONNREFUSED);
			else
				ctx->counters.drop_invalid++;
		} else {
			utp_socket_fail(s, UTP_ECONNRESET);
		}
		return;
	}
	/* Only the STATE reply to our SYN says where the acceptor's data starts:
	 * its DATA may overtake it, and is dropped (it will be resent) rather
	 * than guessed at. */
	if (s->state == UTPKIT_SOCK_SYN_SENT && (pk->ack_nr != s->syn_seq || pk->type != ST_STATE)) {
		ctx->counters.drop_invalid++;
		return;
	}
	utp_accept_confirmed(s);

	s->stats.nrecv++;
	s->last_recv = ctx->now;
	s->probes_unanswered = 0;
	/* A peer that answers but never acknowledges new data (say, a path that
	 * loses our full-size packets) is as good as dead: the timeout count
	 * resets only on progress (utp_out_on_ack) or when the peer's window
	 * explains the silence. */
	if (pk->wnd < utp_out_payload_max(s))
		s->consecutive_timeouts = 0;
	if (pk->ts != 0) {
		/* One-way delay of the peer's packets (plus clock offset); sent back
		 * in our timestamp_difference field for the peer's LEDBAT. */
		s->reply_micro = (uint32)ctx->now - pk->ts;
		utp_delay_add(&s->their_hist, s->reply_micro, ctx->now);
	}

	if (s->state == UTPKIT_SOCK_SYN_SENT) {
		s->peer_wnd = pk->wnd;
		on_connected(s, pk);
		if (s->zombie || s->state == UTPKIT_SOCK_ERROR)
			return;
	} else if (!s->is_acceptor && pk->type == ST_STATE && pk->ack_nr == s->syn_seq) {
		/* The acceptor repeats its SYN-ACK while it holds data for us
		 * unconfirmed (our confirming ACK was lost): confirm again. */
		utp_ack_defer(s);
	}

	if (utp_out_on_ack(s, pk) != 0)
		return;
	if (s->zombie || s->state == UTPKIT_SOCK_ERROR)
		return;
	if (pk->type == ST_DATA || pk->type == ST_FIN)
		on_data(s, pk);
	if (s->zombie || s->state == UTPKIT_SOCK_ERROR)
		return;
	utp_out_flush(s);
	utp_out_maybe_writable(s);
	if (!s->zombie)
		utp_timer_update(s);
}
