/*
 * utp_packet.c -- the BEP 29 header codec, SACK bitmaps and the datagram
 * classifier.  Everything that reads peer bytes checks every length first.
 *
 *  0       4       8               16              24              32
 *  +-------+-------+---------------+---------------+---------------+
 *  | type  | ver   | extension     | connection_id                 |
 *  | timestamp_microseconds                                        |
 *  | timestamp_difference_microseconds                             |
 *  | wnd_size                                                      |
 *  | seq_nr                        | ack_nr                        |
 *  +-------+-------+---------------+---------------+---------------+
 */
#include "utp_internal.h"

static uint16 rd16(const byte *p) { return (uint16)((p[0] << 8) | p[1]); }

static uint32 rd32(const byte *p)
{
	return ((uint32)p[0] << 24) | ((uint32)p[1] << 16) | ((uint32)p[2] << 8) | p[3];
}

static void wr16(byte *p, uint16 v)
{
	p[0] = (byte)(v >> 8);
	p[1] = (byte)v;
}

static void wr32(byte *p, uint32 v)
{
	p[0] = (byte)(v >> 24);
	p[1] = (byte)(v >> 16);
	p[2] = (byte)(v >> 8);
	p[3] = (byte)v;
}

int utp_packet_parse_untrusted(const byte *buf, size_t len, utp_packet *pk)
{
	size_t off = UTP_HEADER_SIZE;
	uint8 ext;

	if (buf == NULL || len < UTP_HEADER_SIZE)
		return UTP_ERR_MALFORMED;
	if ((buf[0] & 0x0f) != UTP_VERSION || (buf[0] >> 4) >= ST_NUM_TYPES)
		return UTP_ERR_MALFORMED;

	pk->type = buf[0] >> 4;
	ext = buf[1];
	pk->conn_id = rd16(buf + 2);
	pk->ts = rd32(buf + 4);
	pk->ts_diff = rd32(buf + 8);
	pk->wnd = rd32(buf + 12);
	pk->seq_nr = rd16(buf + 16);
	pk->ack_nr = rd16(buf + 18);
	pk->sack = NULL;
	pk->sack_len = 0;

	/* The extension chain: each link is (next type, length, bytes).  Unknown
	 * types are skipped; each link costs at least two bytes, so the loop is
	 * bounded by the datagram length. */
	while (ext != UTP_EXT_NONE) {
		uint8 next, elen;
		if (len - off < 2)
			return UTP_ERR_MALFORMED;
		next = buf[off];
		elen = buf[off + 1];
		off += 2;
		if (len - off < elen)
			return UTP_ERR_MALFORMED;
		/* BEP 29 asks for a SACK bitmap of a multiple of 32 bits, but real
		 * stacks send others (libtorrent: (span + 7) / 8 bytes), so any
		 * length is taken: bits past its end count as zero, and an empty
		 * bitmap is no bitmap.  The first SACK counts; libutp's
		 * extension-bits link (type 2) and every other type are skipped. */
		if (ext == UTP_EXT_SACK && elen > 0 && pk->sack == NULL) {
			pk->sack = buf + off;
			pk->sack_len = elen;
		}
		off += elen;
		ext = next;
	}

	pk->payload = buf + off;
	pk->payload_len = len - off;
	return 0;
}

size_t utp_packet_write_header(byte *out, int type, uint16 conn_id, uint32 ts,
                               uint32 ts_diff, uint32 wnd, uint16 seq_nr,
                               uint16 ack_nr, const byte *sack, uint32 sack_len)
{
	out[0] = (byte)((type << 4) | UTP_VERSION);
	out[1] = sack_len ? UTP_EXT_SACK : UTP_EXT_NONE;
	wr16(out + 2, conn_id);
	wr32(out + 4, ts);
	wr32(out + 8, ts_diff);
	wr32(out + 12, wnd);
	wr16(out + 16, seq_nr);
	wr16(out + 18, ack_nr);
	if (sack_len == 0)
		return UTP_HEADER_SIZE;
	out[20] = UTP_EXT_NONE;
	out[21] = (byte)sack_len;
	memcpy(out + 22, sack, sack_len);
	return UTP_HEADER_SIZE + 2 + sack_len;
}

size_t utp_packet_add_padding(byte *out, size_t hlen, size_t pad)
{
	/* Find the end of the chain just written (header, then maybe SACK). */
	byte *next = out + 1;
	size_t off = UTP_HEADER_SIZE;
	while (*next != UTP_EXT_NONE) {
		next = out + off;
		off += 2 + out[off + 1];
	}
	while (pad >= 2) {
		size_t len = UTP_MIN(pad - 2, (size_t)255);
		if (pad - 2 - len == 1)
			len--;  /* never leave a single byte: a link needs two */
		*next = UTP_EXT_PAD;
		next = out + off;
		out[off] = UTP_EXT_NONE;
		out[off + 1] = (byte)len;
		memset(out + off + 2, 0, len);
		off += 2 + len;
		pad -= 2 + len;
	}
	(void)hlen;
	return off;
}

/* Bit k of a BEP 29 SACK bitmap stands for ack_nr + 2 + k; bytes are in
 * order, bits within a byte from least significant. */
int utp_sack_bit(const byte *sack, uint32 sack_len, uint32 bit)
{
	if (bit / 8 >= sack_len)
		return 0;
	return (sack[bit / 8] >> (bit % 8)) & 1;
}

/* The demultiplexer's table (DESIGN.md): one owner per datagram, decided
 * from its first bytes, cheapest test first. */
int utpkit_classify(const byte *buf, size_t len)
{
	if (buf == NULL || len == 0)
		return UTPKIT_CLASS_OTHER;
	if (len >= UTP_HEADER_SIZE && (buf[0] & 0x0f) == UTP_VERSION && (buf[0] >> 4) < ST_NUM_TYPES)
		return UTPKIT_CLASS_UTP;
	if (buf[0] == 'd')
		return UTPKIT_CLASS_DHT;
	if (len >= 16 && rd32(buf) == 0x417 && rd32(buf + 4) == 0x27101980)
		return UTPKIT_CLASS_TRACKER;  /* BEP 15 request: protocol id */
	if (len >= 8 && rd32(buf) <= 3)
		return UTPKIT_CLASS_TRACKER;  /* BEP 15 reply: action 0..3 */
	return UTPKIT_CLASS_OTHER;
}
